"""The names of aTLAS's 22 datasets (github fredzzhang/atlas), apart from the data package so that the
results tables read them without importing torch (`kr_vlm.data.atlas` has the rest)."""

# kr_vlm's name -> aTLAS's name, in the order of aTLAS's DATASETS.md (and of RandLoRA's dataset loop).
ATLAS_NAMES: dict[str, str] = {
    "stanford_cars_atlas": "Cars",
    "dtd_atlas": "DTD",
    "eurosat_atlas": "EuroSAT",
    "gtsrb": "GTSRB",
    "mnist": "MNIST",
    "resisc45": "RESISC45",
    "sun397_atlas": "SUN397",
    "svhn": "SVHN",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "imagenet_atlas": "ImageNet",
    "stl10": "STL10",
    "food101_atlas": "Food101",
    "caltech101_atlas": "Caltech101",
    "caltech256": "Caltech256",
    "fgvc_aircraft_atlas": "FGVCAircraft",
    "oxford_flowers_atlas": "Flowers102",
    "oxford_pets_atlas": "OxfordIIITPet",
    "cub200": "CUB200",
    "pascal_voc": "PascalVOC",
    "country211": "Country211",
    "ucf101_atlas": "UCF101",
}
ATLAS22: tuple[str, ...] = tuple(ATLAS_NAMES)
