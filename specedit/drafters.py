"""Drafters: a complete low-resolution edit that predicts what will change."""

from __future__ import annotations

from dataclasses import dataclass

from models.packing import pack, unpack
from samplers.field import NoiseField
from samplers.layout import Layout, scaled_grid
from samplers.mixed_res import Trajectory, run_stage
from samplers.schedules import flow_sigmas


@dataclass(frozen=True)
class LowResDrafter:
    """Run the model's own sampler on a grid ``factor`` times coarser per side (16x fewer tokens at 4).

    The target noise is the noise field read at the draft size (so the draft previews the same trajectory)
    and the reference is area-downsampled to the draft size. The schedule's shift follows the draft's token
    count, as the model's sampler would at that resolution.
    """

    factor: float = 4
    steps: int = 8

    def draft(self, editor, field: NoiseField, *, progress: bool = False) -> Trajectory:
        if self.steps < 1:
            raise ValueError(f"a draft needs at least one step, got {self.steps}")
        grid = scaled_grid(editor.grid, self.factor)
        noise = field.at((2 * grid[0], 2 * grid[1]))
        layout = Layout.full(grid, ref_factor=self.factor)
        sigmas = flow_sigmas(self.steps, len(layout), editor.schedule).to(noise.device)
        traj = Trajectory(latent=noise)
        x, _ = run_stage(
            editor.denoiser(layout),
            pack(noise),
            sigmas,
            name="draft",
            layout=layout,
            traj=traj,
            progress=progress,
        )
        traj.latent = unpack(x, grid)
        return traj
