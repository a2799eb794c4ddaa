"""``Isc.train``: the Towhee tutorial's ``op.train(training_args={...})`` (and Towhee's own
``train(training_config, train_dataset, ...)``) over ``run.train``; afterwards the operator embeds
with the new weights."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from .config import from_towhee_config, from_training_args
from .run import Result, train

if TYPE_CHECKING:
    from ..isc import Isc


def train_operator(op: Isc, training_args: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                   resume_checkpoint_path: str | None = None, **kwargs: Any) -> Result:
    """Fine-tune ``op``'s network, then load the last checkpoint into ``op`` (a new network and backend;
    an ONNX export is keyed by the new weights' content). See ``Isc.train``."""
    if eval_dataset is not None:
        raise ValueError('eval_dataset is not used: this training is self-supervised (no labels); evaluate '
                         'the checkpoints with towhee-isc evaluate on a copy-detection set')
    if training_args is not None and not isinstance(training_args, dict):
        if not hasattr(training_args, 'epoch_num'):
            raise TypeError('training_args must be a dict (the tutorial\'s keys) or a towhee TrainingConfig, '
                            f'got {type(training_args).__name__}')
        config, data = from_towhee_config(training_args), None
        if kwargs:
            raise ValueError(f'with a TrainingConfig, pass no other settings (got {sorted(kwargs)})')
    else:
        config, data = from_training_args({**(training_args or {}), **kwargs})
    if resume_checkpoint_path is not None:
        config.resume = str(resume_checkpoint_path)
    items = _items(data, train_dataset)
    result = train(items, op.net, op.img_size, config)
    if not result.checkpoints:  # a distributed run's rank > 0, or no epoch left
        return result
    _reload(op, str(result.last))
    return result


def _items(train_data_dir: Any, train_dataset: Any) -> list[Any]:
    """The images: a folder (or the forms ``towhee-isc embed`` takes), or a dataset of images."""
    if (train_data_dir is None) == (train_dataset is None):
        raise ValueError("give the training images as training_args['train_data_dir'] (a folder of images) "
                         'or as train_dataset (a sequence of images), one of the two')
    if train_dataset is not None:
        if isinstance(train_dataset, (str, bytes)) or not hasattr(train_dataset, '__len__'):
            raise TypeError('train_dataset must be a sequence of images (paths, PIL images, arrays) or of '
                            f'(image, label) pairs, got {type(train_dataset).__name__}')
        return [train_dataset[i] for i in range(len(train_dataset))]
    from ..workflow.descriptors import find_images
    folders = train_data_dir if isinstance(train_data_dir, (list, tuple)) else [train_data_dir]
    return find_images(folders)


def _reload(op: Isc, checkpoint: str) -> None:
    """Point ``op`` at ``checkpoint``: its spec, network and backend, as if built with checkpoint_path=."""
    from ..network import IscModel, ModelSpec, accelerated_model
    old = op.model
    op.spec = ModelSpec.resolve(op.model_name, checkpoint, op.spec.timm_backbone, op.img_size)
    op.model_name = op.spec.name
    backend = old.backend.name if isinstance(old, IscModel) else 'torch'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        op.model = accelerated_model(op.spec, op.device, backend, op.precision, op.num_threads)

