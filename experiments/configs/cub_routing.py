"""Task Routing on CUB-200-2011's binary attributes (Strezoski et al., ICCV 2019).

A routed VGG-11-BN, one binary head per attribute, one task per batch (the paper), on 20, 40,
100 or 312 attribute tasks, swept over the sharing ratio σ with both mask schemes.

Prepare the data once (offline, from the downloaded CUB_200_2011/ tree; see tr_jax.data.cub):
  python -c "from tr_jax.data.cub import prepare_cub; prepare_cub('DATA/cub', 'DATA/tfds')"
Launch (variants after ':' are comma-separated words):
  python -m tr_jax train --config experiments/configs/cub_routing.py --workdir runs/cub40 \
      --config.data_dir=DATA/tfds --config.num_tasks=40 --config.sharing=0.5
  python -m tr_jax train --config experiments/configs/cub_routing.py:shared ...    # σ = 1
  python -m tr_jax train --config experiments/configs/cub_routing.py:disjoint ...  # σ = 0
  python -m tr_jax train --config experiments/configs/cub_routing.py:runlocal ...  # tiny
Add --resume to continue a stopped run. The sweep (``sweep()``) and the independent per-task
networks (``independent_overrides(T)``) are lists of config overrides, e.g. one run each:
  config.update(overrides); tr_jax.experiment.train_and_evaluate(config, workdir)

The paper lists no optimizer schedule or input size for CUB; SGD 0.01 (momentum 0.9), batch
32 and 64x64 inputs are our choices (the sizes the anchors in shared/anchors measure).
"""
import ml_collections
from ml_collections import config_dict

from tr_jax.experiment import config_variants

VARIANTS = ("runlocal", "shared", "disjoint")
TASK_COUNTS = (20, 40, 100, 312)              # the paper's settings on CUB
SHARING = (0.0, 0.25, 0.5, 0.75, 1.0)          # the σ sweep


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; ``arg`` holds comma-separated variants from ``VARIANTS``."""
    variants = config_variants(arg, VARIANTS)
    c = ml_collections.ConfigDict()
    c.seed = 0                   # seeds parameters, routing masks (own stream) and data order
    c.dataset = "cub"            # tr_jax's cub2011_attributes TFDS dataset (312 attributes)
    c.data_dir = config_dict.placeholder(str)   # TFDS data_dir holding it (None: TFDS default)
    c.num_tasks = 40             # first N attributes by dataset_kwargs.task_order: 20|40|100|312
    c.tasks = ()                 # explicit attribute names/indices (overrides num_tasks)
    c.dataset_kwargs = ml_collections.ConfigDict({
        "task_order": "id",      # "id": first N attribute ids | "frequency": most present
        "not_visible": "keep",   # "keep" labels as annotated | "mask" drops "not visible" ones
        "image_size": (64, 64),  # (H, W) after resizing
        "augment": True,         # random horizontal flips on train
        "manual_dir": config_dict.placeholder(str),  # prepare from here when not prepared
    })
    c.model = "RoutedVGG"        # VGG-11 cfg "A" with a TRL after every conv
    c.model_kwargs = ml_collections.ConfigDict({
        "cfg": "A",              # VGG-11
        "batch_norm": True,      # VGG-11-BN
        "width_multiplier": 1.0,  # scales every conv width
    })
    c.sharing = 0.5              # sharing ratio σ in [0, 1]; 1.0 = fully shared
    c.scheme = "random"          # "random" (official code; σ > 0) | "partition" (σ = 0 allowed)
    c.mode = "task_per_batch"    # the paper: one task per batch, tasks in shuffled order
    c.batch_size = 32            # examples per step
    c.num_epochs = 50            # passes over the 5,994 training images
    c.optimizer = "sgd"          # sgd | adam
    c.learning_rate = 0.01       # peak learning rate
    c.momentum = 0.9             # SGD momentum
    c.lr_decay_epochs = 20       # multiply lr by lr_decay every this many epochs (0: constant)
    c.lr_decay = 0.1             # decay factor
    c.early_stop_patience = 0    # epochs without validation improvement before stopping (0: off)
    c.chunk_size = 8             # tasks per vmapped chunk in all-tasks evaluation forwards
    c.eval_batch_size = 256      # test batch size
    c.log_every_steps = 50       # metrics.jsonl / TensorBoard cadence
    c.checkpoint_every_steps = 500  # checkpoint cadence in steps (0: no checkpoints)
    c.keep_checkpoints = 3       # newest checkpoints kept
    if "shared" in variants:
        c.sharing = 1.0          # baseline: the classic fully shared network
    if "disjoint" in variants:
        c.sharing, c.scheme = 0.0, "partition"  # baseline: disjoint per-task sub-networks
    if "runlocal" in variants:   # a few seconds on a CPU (e.g. on a fabricated CUB tree)
        c.num_tasks = 20
        c.dataset_kwargs.image_size = (32, 32)
        c.dataset_kwargs.shuffle_buffer = 16
        c.model_kwargs.width_multiplier = 1 / 16
        c.batch_size = 2
        c.num_epochs = 2
        c.chunk_size = 0
        c.eval_batch_size = 8
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
        c.progress = False
    return c


def sweep(task_counts=TASK_COUNTS, sharing=SHARING,
          schemes=("random", "partition")) -> list[dict]:
    """Overrides of the σ sweep: every task count x scheme x σ.

    σ = 0 runs only with ``"partition"`` (the random scheme would leave tasks no unit) and
    σ = 1 only once (both schemes give all-ones masks).
    """
    runs = []
    for t in task_counts:
        for scheme in schemes:
            for s in sharing:
                if (s == 0.0 and scheme == "random") or (s == 1.0 and scheme != schemes[0]):
                    continue
                runs.append({"num_tasks": t, "sharing": s, "scheme": scheme})
    return runs


def independent_overrides(num_tasks: int) -> list[dict]:
    """Overrides for the independent baseline: one unrouted network per task (T runs)."""
    return [{"tasks": (i,), "sharing": None} for i in range(num_tasks)]
