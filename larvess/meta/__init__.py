"""Metadata shipped with the package: names tables, curated WordNet mappings, split lists."""

from pathlib import Path

META = Path(__file__).resolve().parent
COCO_STUFF_LABELS = META / "cocostuff_labels.txt"  # COCO-Stuff labels.txt (183 lines, id: name)
ADE150_NAMES = META / "objectInfo150.txt"  # ADE20K SceneParsing objectInfo150.txt
ADE847_NAMES = META / "ade847_categories.tsv"  # trainId, ADE20K_2021 id, name (847 classes)
NOVEL_LARVSEG = META / "ade150_novel_larvseg.txt"  # LarvSeg's 87 novel A150 classes
