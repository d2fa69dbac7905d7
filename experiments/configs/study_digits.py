"""Quickstart study: choose task groups with TAG, CS and HOA on 8 offline digits tasks.

A tiny unrouted MLP (one shared hidden layer, one head per task) so that the 36 single-task and
pairwise HOA networks, the chosen groups and the random groupings all train in well under a
few minutes on a 2-core CPU, no download:
  python -m tr_jax                                    # this study, output in runs/quickstart
  python -m tr_jax study --config experiments/configs/study_digits.py --workdir runs/study
"""
import ml_collections

# The eight digit properties (the one-vs-rest tasks are left out to keep HOA at 36 runs).
TASKS = ("even", "ge_5", "prime", "closed_loop", "multiple_of_3", "straight_strokes", "square",
         "fibonacci")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                   # seeds parameters, data order and the validation split
    c.dataset = "digits"         # offline: sklearn's 8x8 digits
    c.tasks = TASKS              # task subset by name
    c.model = "MLP"              # unrouted shared encoder + one head per task (as the TAG study)
    c.model_kwargs = ml_collections.ConfigDict({"hidden": (32,)})
    c.sharing = None             # no task routing: the TAG study's plain shared trunk
    c.mode = "all_tasks"         # summed per-task losses (TAG's objective)
    c.batch_size = 64
    c.num_epochs = 20            # 16 steps per epoch on the 1078 training images
    c.optimizer = "sgd"          # SGD with momentum, as the official TAG CelebA code
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.lr_decay_epochs = 0
    c.eval_batch_size = 512      # validation and test in one batch each
    c.validation_fraction = 0.2  # of "train", held out for HOA's validation errors
    # affinity (TAG lookahead every step, with a plain SGD step lr * g_i; "optimizer" would
    # take the optimizer's own momentum step instead)
    c.affinity_every = 1
    c.lookahead = "sgd"
    c.strategy = "auto"
    # study
    c.group_counts = (2, 3, 4)   # numbers of networks to select
    c.random_seeds = 10          # random partitions per number of networks
    c.repeats = 3                # training seeds per evaluated network (errors averaged)
    c.selection_method = "auto"  # grouping.select_groups method (exact up to 12 tasks)
    c.progress = True
    return c
