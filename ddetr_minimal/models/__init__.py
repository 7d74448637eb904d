"""The models (chapters 1-3, 5, 6, 8, 9), from the attention layers up to the detectors.

* :mod:`.attention` -- multi-head attention written out (what DETR uses);
* :mod:`.deformable_attention` -- ``MSDeformAttn``: offsets, weights, projections, the paper's init;
* :mod:`.position_encoding` -- sine embeddings of positions and boxes;
* :mod:`.backbone` -- ResNet-50 (frozen BN) and the small CNN, strides 8/16/32;
* :mod:`.heads` -- the MLP box head, the focal prior, boxes relative to reference points;
* :mod:`.transformer` -- the deformable encoder and decoder, reference points, two-stage proposals;
* :mod:`.deformable_detr`, :mod:`.detr` -- the two detectors;
* :mod:`.matcher`, :mod:`.criterion`, :mod:`.postprocess` -- matching, losses, top-k boxes;
* :mod:`.build` -- ``build_model``, the factory;
* :mod:`.released` -- ``load_released``: the released COCO models, from the official files or the
  Hugging Face hub (layouts in :mod:`.official_checkpoint` and :mod:`.hf_checkpoint`);
* :mod:`.inference` -- photos to a padded batch, confident detections, where encoder and decoder
  layers sample (Deformable DETR) or attend (DETR).
"""
