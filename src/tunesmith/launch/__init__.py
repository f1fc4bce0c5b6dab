"""Running one training job as several processes: ``torchrun`` launching (``torchrun.py``) and the process group
each worker joins (``distributed.py``)."""
