"""ehrfm.launch: SLURM sbatch generation and the multi-node torchrun launcher, with preemption -> checkpoint ->
requeue -> resume (``ehrfm launch``)."""
