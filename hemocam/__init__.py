"""hemocam: weakly supervised intracranial hemorrhage segmentation from slice labels.

Modules mirror the workflow stages (Ramananda & Sundaresan, arXiv 2309.16627):

- ``phantom``      synthetic head CT cohorts (the demo and every test)
- ``ingest``       DICOM/NIfTI cohorts -> HU NIfTI + slice labels + masks
- ``windows``      multi-window channels from HU
- ``brainmask``    skull/scalp stripping
- ``preprocess``   per-scan training cache (memory-mappable) and its inverse mapping
- ``models``       ``resnet_lstm`` (classifier), ``unet`` (segmenter)
- ``train``        the shared training loop (AMP, checkpoint/resume, early stopping)
- ``distributed``  multi-GPU training in one allocation (DDP ranks started through torchrun)
- ``classifier``   classifier data, training and slice probabilities
- ``cam``          Grad-CAM / Grad-CAM++ through the LSTM
- ``pseudomask``   CAM + intensity cues -> pseudo-masks
- ``segmenter``    U-Net training on pseudo-masks and inference
- ``metrics``      Dice, HD95, volumes
"""

__version__ = "0.1.0"
