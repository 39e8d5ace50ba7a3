"""bnlab's Hydra launcher plugin (Hydra takes launchers only from the hydra_plugins package):
hydra/launcher=slurm uses SlurmLauncher, Hydra's submitit SLURM launcher with a bounded wait for
tasks that die without a result (bnlab.slurm)."""
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _HydraSlurmLauncher


class SlurmLauncher(_HydraSlurmLauncher):
    """Same parameters as Hydra's SlurmLauncher; launch() is bnlab.slurm.launch."""

    def launch(self, job_overrides, initial_job_idx):
        from bnlab import slurm

        return slurm.launch(self, job_overrides, initial_job_idx)
