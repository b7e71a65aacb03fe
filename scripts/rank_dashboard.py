"""Compare the effective ranks of several runs on one page (the logic lives in kr_vlm.dashboard).

python scripts/rank_dashboard.py logs/demo/multiruns/<time>
"""

import sys

from kr_vlm.dashboard import main

if __name__ == "__main__":
    sys.exit(main())
