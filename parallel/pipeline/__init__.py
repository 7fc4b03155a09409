"""Pipeline schedules as data: per-rank action lists, their validator and timing simulator,
and the cost-based cut of the layer stack into stages. Pure Python (no torch), so the
launcher can build, check and draw a schedule before any process starts."""

from parallel.pipeline.actions import Action, Kind, PipelineSchedule
from parallel.pipeline.schedules import PIPELINE_SCHEDULES, build_schedule
from parallel.pipeline.simulate import Durations, Timeline, simulate
from parallel.pipeline.stage_cut import Piece, StagePlan, cut_stages, model_pieces, mtp_needs_embedding, plan_stages
from parallel.pipeline.validate import ScheduleError, validate_schedule

__all__ = [
    "PIPELINE_SCHEDULES",
    "Action",
    "Durations",
    "Kind",
    "Piece",
    "PipelineSchedule",
    "ScheduleError",
    "StagePlan",
    "Timeline",
    "build_schedule",
    "cut_stages",
    "model_pieces",
    "mtp_needs_embedding",
    "plan_stages",
    "simulate",
    "validate_schedule",
]
