"""The exit codes a rank ends with and the launcher passes on or acts upon.

Defined once, torch-free, so the launcher imports the same numbers the ranks exit with.
"""

CONFIG_ERROR_EXIT_CODE = 2  # a bad config, or resume finds no usable checkpoint: fix the input, do not retry
NON_FINITE_EXIT_CODE = 3  # train.on_nan=stop saw a non-finite loss, gradient or weight
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; run me again
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C: the shell's 128 + SIGINT (after the ranks saved, or before any started)
