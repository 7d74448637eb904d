"""Training (chapters 7, 8): one epoch, the command lines, backbone pretraining, the experiment.

* :mod:`.engine` -- ``train_one_epoch`` and ``evaluate``;
* :mod:`.train`, :mod:`.evaluate` -- ``python -m ddetr_minimal train`` / ``evaluate``;
* :mod:`.finetune` -- ``train --pretrained``: a released model on a dataset's own classes;
* :mod:`.pretrain` -- the small CNN's stand-in for ImageNet weights;
* :mod:`.protocol`, :mod:`.repeated` -- the recorded convergence experiment
  (``python -m ddetr_minimal experiments seeds``): seeds, each model on its own schedule;
* :mod:`.runs` -- its pieces (the toy dataset, a run's curve, a training subprocess);
* :mod:`.noise` -- the spread of AP over halves of the validation images;
* :mod:`.checkpoints` -- the trained checkpoints kept in ``data/checkpoints`` (``load_trained``).
"""
