"""Everything that makes a model: data sets, patch loading and augmentation, losses, the trainer,
the training fingerprint. Nothing in the runtime (``maml segment``, Slicer) imports this package.

Modules by lifecycle step: :mod:`.dataset` (raw nnU-Net data sets, splits, the preprocessed cache),
:mod:`.loading` (patches and augmentation), :mod:`.losses`, :mod:`.options` (presets, schedule),
:mod:`.trainer` (the loop, split into steps), :mod:`.validation`, :mod:`.logs`, :mod:`.state`
(resumable state), :mod:`.distributed`, :mod:`.fingerprint` (the out-of-distribution statistics).
"""
