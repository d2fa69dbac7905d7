"""Scale: a routed VGG-11 with 312 tasks, per-example routing, the 312x312 TAG affinity.

The training step routes each example through its own task (``mode="per_example"``: one
forward trains many tasks) and, every ``affinity_every`` steps, measures the lookahead
affinity inside the same jitted step with per-example task losses (``affinity_mode``: one
forward per lookahead instead of 312), its source tasks split over the mesh's ``"task"``
axis and chunked on each device (tr_jax.affinity.sharded). Batches carry every task
(``balanced_tasks``: task ids dealt round-robin, shuffled), so every task's loss is defined.

Data: the full config reads CUB-200-2011's 312 attributes (tr_jax.data.cub, prepared
offline). ``runlocal`` fabricates 312 binary tasks from the offline 8x8 digits: task k =
"the digit is in subset S_k", 312 distinct random subsets of {0..9} (real images, made-up
tasks; tasks that share digits should help each other).

Launch (the scale driver: unlike ``tr-jax train``, it builds the fabricated runlocal tasks and
deals balanced task ids):
  python benchmarks/scaling.py --scale experiments/configs/vgg312_scale.py:runlocal \
      --workdir runs/vgg312_local
  python benchmarks/scaling.py --scale experiments/configs/vgg312_scale.py \
      --workdir runs/vgg312 --config.data_dir=DATA/tfds         # accelerators
Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID on every host.
"""
import ml_collections
from ml_collections import config_dict

VARIANTS = ("runlocal",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; ``arg`` holds comma-separated variants from ``VARIANTS``."""
    variants = set(filter(None, (arg or "").split(",")))
    if variants - set(VARIANTS):
        raise ValueError(f"unknown variants {sorted(variants - set(VARIANTS))}; use {VARIANTS}.")
    c = ml_collections.ConfigDict()
    c.seed = 0                   # seeds parameters, routing masks (own stream) and data order
    c.dataset = "cub"            # CUB-200-2011 attribute tasks | "digits_subsets" (fabricated)
    c.data_dir = config_dict.placeholder(str)   # TFDS data_dir holding cub2011_attributes
    c.num_tasks = 312            # all 312 attributes
    c.tasks = ()                 # explicit task subset (overrides num_tasks)
    c.dataset_kwargs = ml_collections.ConfigDict({
        "image_size": (64, 64),  # (H, W) after resizing
    })
    c.model = "RoutedVGG"        # VGG-11 cfg "A" with a TRL after every conv
    c.model_kwargs = ml_collections.ConfigDict({
        "cfg": "A",              # VGG-11
        "batch_norm": True,      # VGG-11-BN
        "width_multiplier": 1.0,  # scales every conv width
    })
    c.sharing = 0.5              # sharing ratio σ in [0, 1]
    c.scheme = "random"          # mask scheme
    c.mode = "per_example"       # each example carries its own task id
    c.balanced_tasks = True      # deal task ids round-robin so every batch holds every task
    c.batch_size = 624           # examples per step (>= num_tasks for per-example affinity)
    c.num_epochs = 30            # passes over the training images
    c.optimizer = "sgd"          # sgd | adam
    c.learning_rate = 0.01       # learning rate; also normalizes Z
    c.momentum = 0.9             # SGD momentum
    c.affinity = "lookahead"     # TAG lookahead affinity inside the train step
    c.affinity_mode = "per_example"  # task losses on their own routed examples
    c.affinity_every = 100       # measure every this many steps
    c.lookahead = "sgd"          # Δ_i = lr g_i | "optimizer": the optimizer's own step
    c.strategy = "chunked"       # lookahead forwards run in chunks on each device
    c.affinity_chunk_size = 8    # source tasks per chunk on each device (bounds memory)
    c.mesh = ml_collections.ConfigDict({"data": 1, "task": 0})  # 0: all remaining devices
    c.dtype = "float32"          # compute dtype ("bfloat16": mixed precision, float32 params)
    c.chunk_size = 8             # tasks per vmapped chunk in all-tasks evaluation forwards
    c.eval_batch_size = 256      # test batch size
    c.log_every_steps = 20       # metrics cadence
    if "runlocal" in variants:   # minutes on a 2-core CPU, offline
        c.dataset = "digits_subsets"
        c.dataset_kwargs = ml_collections.ConfigDict({"seed": 0})  # seeds the task subsets
        c.model_kwargs.width_multiplier = 0.125  # VGG-11 with 8..64 channels
        c.batch_size = 312       # one example per task per step
        c.num_epochs = 10        # 4 steps per epoch over the 1347 training images
        c.optimizer = "adam"
        c.learning_rate = 3e-3
        c.affinity_every = 8     # every other epoch: 5 measured steps
        c.eval_batch_size = 450  # the whole test split
        c.log_every_steps = 1
    return c
