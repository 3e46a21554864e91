"""Drafters: a complete low-resolution edit that predicts what will change."""

from __future__ import annotations

from dataclasses import dataclass

from models.work import EditShape, Forward
from samplers.field import NoiseField
from samplers.layout import Layout, scaled_grid
from samplers.mixed_res import Trajectory, sample_stage
from samplers.schedules import ShiftSchedule, flow_sigmas


@dataclass(frozen=True)
class LowResDrafter:
    """Run the model's own sampler on a grid ``factor`` times coarser per side (16x fewer tokens at 4).

    The target noise is the noise field read at the draft size (so the draft previews the same trajectory)
    and the reference is downsampled by the same factor. The schedule's shift follows the draft's token
    count, as the model's sampler would at that resolution.
    """

    factor: float = 4
    steps: int = 8
    schedule: ShiftSchedule | None = None  # None: the editor's; a step-distilled model's own schedule

    def __post_init__(self):
        if not self.factor >= 1 or self.steps < 1:  # also rejects a NaN factor
            raise ValueError(
                f"a draft needs factor >= 1 and at least one step, got {self.factor}, {self.steps}"
            )

    def draft(self, editor, noise_field: NoiseField, *, callback=None, progress: bool = False) -> Trajectory:
        grid = scaled_grid(editor.grid, self.factor)
        noise = noise_field.at((editor.patch * grid[0], editor.patch * grid[1]))
        layout = Layout.full(grid, ref_factor=self.factor)
        sigmas = flow_sigmas(self.steps, len(layout), self.schedule or editor.schedule).to(noise.device)
        traj = Trajectory(latent=noise)
        x, _ = sample_stage(editor, layout, editor.pack(noise), sigmas, "draft", traj=traj, callback=callback,
                            progress=progress)  # fmt: skip
        traj.latent = editor.unpack(x, grid)
        return traj

    def plan(self, shape: EditShape) -> list[Forward]:
        grid = scaled_grid(shape.grid, self.factor)
        return [Forward("draft", grid[0] * grid[1], self.factor, shape.batch)] * self.steps
