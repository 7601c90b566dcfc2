"""A plugin that loads in the server process but not in a worker: the verifier workers never come up.

Lets a test see what a request meets while the workers are (still) not ready.
"""

import multiprocessing

if multiprocessing.parent_process() is not None:  # a verifier worker (a child of the forkserver)
    raise ImportError("reward_plugin_no_workers refuses to load in a worker process")
