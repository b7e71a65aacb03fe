"""A CSV logger that a resumed run continues instead of starting over (``configs/logger/csv.yaml``)."""

from __future__ import annotations

import csv
import io
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from kr_vlm.files import write_text_atomic


class _ContinuingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, which deletes an existing ``metrics.csv`` when it starts, made to keep
    the rows that come before what this process logs.

    At its first save it keeps the existing rows whose step is below the first step this process
    logged and drops the others: a run resumed from step k logs again from step k, so the steps an
    interrupted run logged after its last checkpoint give way to the resumed run's, and the log
    reads as one run. A fresh run logs from step 0 and so starts a new file.
    """

    def __init__(self, log_dir: str) -> None:
        self._continued = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep ``metrics.csv``: `save` decides which rows stay."""

    def save(self) -> None:
        if self.metrics and not self._continued:
            self._continue_earlier_rows(min(int(row["step"]) for row in self.metrics))
        super().save()

    def _continue_earlier_rows(self, first_step: int) -> None:
        self._continued = True
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            earlier = [row for row in reader if row.get("step") and int(row["step"]) < first_step]
            header = list(reader.fieldnames or [])
        if not earlier:
            os.remove(self.metrics_file_path)
            return
        # Sorted columns, as Lightning's writer keeps them (it rewrites the file when new ones come).
        self.metrics_keys = sorted(header)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(earlier)
        write_text_atomic(self.metrics_file_path, text.getvalue())


class ContinuingCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose ``metrics.csv`` a resumed run continues (see
    `_ContinuingExperimentWriter`); everything else is Lightning's."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
