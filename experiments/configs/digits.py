"""Task Routing on the offline digits attribute tasks: a routed SmallCNN, 18 tasks, 8x8 images.

Runs in well under a minute on a 2-core CPU, no download (`tr-jax train`'s default config):
  python -m tr_jax train --config experiments/configs/digits.py --workdir runs/digits
  python -m tr_jax train --config experiments/configs/digits.py --config.sharing=1.0
  python -m tr_jax train --config experiments/configs/digits.py --workdir runs/digits --resume
  python -m tr_jax train --config experiments/configs/digits.py --config.affinity=lookahead
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                   # seeds parameters, routing masks (own stream) and data order
    c.dataset = "digits"         # offline: sklearn's 8x8 digits, 18 binary attribute tasks
    c.tasks = ()                 # task subset by name; empty = all tasks
    c.model = "SmallCNN"         # RoutedVGG | RoutedResNet | RoutedResNet18 | SmallCNN | MLP
    c.model_kwargs = ml_collections.ConfigDict({"widths": (32, 64)})  # backbone arguments
    c.sharing = 0.5              # sharing ratio σ in [0, 1]; 1.0 = fully shared
    c.scheme = "random"          # mask scheme: "random" (official code) | "partition"
    c.mode = "per_example"       # task_per_batch | per_example | all_tasks
    c.batch_size = 64            # examples per step
    c.num_epochs = 12            # passes over the 1347 training images
    c.optimizer = "adam"         # sgd | adam
    c.learning_rate = 3e-3       # peak learning rate
    c.momentum = 0.9             # SGD momentum (ignored by adam)
    c.lr_decay_epochs = 0        # multiply lr by lr_decay every this many epochs (0: constant)
    c.lr_decay = 0.5             # decay factor
    c.chunk_size = 0             # tasks per vmapped chunk in all-tasks forwards (0: all at once)
    c.log_every_steps = 20       # metrics.jsonl cadence
    c.eval_batch_size = 450      # test batch size
    c.progress = True            # tqdm progress bar
    c.affinity = ""              # "" (off) | lookahead | cosine | taylor | sketch | representation
    c.affinity_every = 1         # measure affinity every k-th step
    c.lookahead = "sgd"          # lookahead step: sgd (lr * g_i) | optimizer (the optimizer's own)
    c.checkpoint_every_steps = 100  # Orbax checkpoint cadence (0: off); also at the end/SIGTERM
    c.keep_checkpoints = 2       # checkpoints kept
    return c
