"""TAG's CelebA 9-task study (Fifty et al., NeurIPS 2021) with the official hyper-parameters.

The small ResNet of the official code (unrouted: sharing=None), one Dense(2) head per task,
summed softmax cross-entropy over all 9 tasks on every example, 64x64 images, SGD lr 5e-4
momentum 0.9, batch 256, lr halved every 15 epochs, up to 100 epochs, early stopping after 10
epochs without a lower validation error (1 - mean accuracy over tasks on the validation split).
The lookahead affinity Z[i, j] is measured at every step with the optimizer's own update (SGD
momentum, as in the official CelebA code); the run writes its mean as affinity.npy/.json.

Prepare celeb_a once on a machine with internet:
  python -c "from tr_jax.data.celeba import prepare_celeba; prepare_celeba('DIR')"
Launch:
  python -m tr_jax train --config experiments/configs/celeba_tag.py --workdir runs/tag_all \
      --config.data_dir=DIR
  python -m tr_jax train --config experiments/configs/celeba_tag.py:runlocal --workdir /tmp/t
Add --resume to continue a stopped run. After grouping the affinity (tr_jax.grouping.select_groups),
train one network per group, without affinity, with ``group_overrides(groups)``: for each,
config.update(overrides) and tr_jax.experiment.train_and_evaluate(config, workdir).
"""
import ml_collections
from ml_collections import config_dict

from tr_jax.data.celeba import TAG_TASKS
from tr_jax.experiment import config_variants

VARIANTS = ("runlocal",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; ``arg`` holds comma-separated variants from ``VARIANTS``."""
    variants = config_variants(arg, VARIANTS)
    c = ml_collections.ConfigDict()
    c.seed = 0                   # seeds parameters and data order
    c.dataset = "celeb_a"        # TFDS celeb_a (40 attributes, official splits)
    c.data_dir = config_dict.placeholder(str)   # TFDS data_dir holding it (None: TFDS default)
    c.tasks = TAG_TASKS          # the 9 attributes of the TAG study, in this order
    c.dataset_kwargs = ml_collections.ConfigDict({
        "image_size": (64, 64),  # (H, W) after bilinear resizing
        "augment": False,        # no flips, as in the official code
    })
    c.validation_split = "validation"  # split watched by early stopping
    c.model = "RoutedResNet"     # conv3x3-64, BN, ReLU, maxpool 3/2, residual block, avgpool 2
    c.model_kwargs = ml_collections.ConfigDict({"width": 64})  # conv width
    c.sharing = config_dict.placeholder(float)  # None: the official unrouted network
    c.scheme = "random"          # mask scheme, used only when sharing is set
    c.mode = "all_tasks"         # every example trains every task: summed loss over tasks
    c.batch_size = 256           # examples per step
    c.num_epochs = 100           # upper bound; early stopping usually ends sooner
    c.optimizer = "sgd"          # sgd | adam
    c.learning_rate = 5e-4       # SGD learning rate
    c.momentum = 0.9             # SGD momentum
    c.lr_decay_epochs = 15       # halve the learning rate every 15 epochs
    c.lr_decay = 0.5             # decay factor
    c.early_stop_patience = 10   # epochs without validation improvement before stopping
    c.affinity = "lookahead"     # TAG lookahead (None: off; cosine|taylor|sketch|representation)
    c.affinity_every = 1         # measure at every step, as the official CelebA code
    c.lookahead = "optimizer"    # Δ_i = the optimizer's own step (SGD momentum) | "sgd": lr g_i
    c.strategy = "auto"          # how the T lookahead forwards run (vmap|unrolled|chunked|auto)
    c.chunk_size = 0             # tasks per vmapped chunk (0: all 9 at once)
    c.eval_batch_size = 512      # validation/test batch size
    c.log_every_steps = 100      # metrics.jsonl / TensorBoard cadence
    c.checkpoint_every_steps = 500  # checkpoint cadence in steps (0: no checkpoints)
    c.keep_checkpoints = 3       # newest checkpoints kept
    if "runlocal" in variants:   # a few seconds on a CPU (e.g. on tfds.testing.mock_data)
        c.dataset_kwargs.image_size = (16, 16)
        c.dataset_kwargs.shuffle_buffer = 16
        c.model_kwargs.width = 8
        c.batch_size = 4
        c.num_epochs = 3
        c.early_stop_patience = 1
        c.affinity_every = 2
        c.eval_batch_size = 8
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
        c.progress = False
    return c


def group_overrides(groups) -> list[dict]:
    """One override per task group (tuples of indices into ``TAG_TASKS``): its network's tasks,
    affinity off."""
    return [{"tasks": tuple(TAG_TASKS[i] for i in group), "affinity": None} for group in groups]
