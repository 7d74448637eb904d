"""Training (chapters 7, 8): one epoch, the command lines, backbone pretraining, experiments.

* :mod:`.engine` -- ``train_one_epoch`` and ``evaluate``;
* :mod:`.train`, :mod:`.evaluate` -- ``python -m ddetr_minimal train`` / ``evaluate``;
* :mod:`.finetune` -- ``train --pretrained``: a released model on a dataset's own classes;
* :mod:`.pretrain` -- the small CNN's stand-in for ImageNet weights;
* :mod:`.experiments` -- the recorded convergence experiment.
"""
