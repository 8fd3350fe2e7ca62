"""Imported first by sample.py and evaluate.py, before torch loads: their OpenMP waits sleep rather than spin
(utils/threads.py says why). Importing it after torch has loaded changes nothing."""

from utils.threads import passive_wait

passive_wait()
