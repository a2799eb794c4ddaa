"""Fine-tuning the ISC network with the winner's self-supervised recipe (``Isc.train``, ``towhee-isc train``).

``augment`` (the views), ``loss`` (contrastive loss in a cross-batch memory), ``data`` (reproducible
batches), ``loop`` (the SGD loop, no files), ``run`` (files, checkpoints, processes), ``operator`` (the
Towhee adapter), ``config`` and ``cli`` (light: no torch at import).
"""
