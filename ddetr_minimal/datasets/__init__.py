"""Data (chapter 7): the toy generator, COCO-layout loading, transforms and COCO evaluation.

* :mod:`.synthetic` -- the toy dataset: shapes of known classes and sizes on cluttered images;
* :mod:`.coco` -- a COCO-layout dataset with padding masks, and the batch collation;
* :mod:`.transforms` -- the paper's augmentation and normalisation;
* :mod:`.coco_eval` -- COCO box AP through pycocotools.
"""
