"""Training engine for the heads: config, resumable loop, checkpoints, schedules, DDP, logging.

``vqa.engine.trainer.Trainer`` runs any ``TrainingTask``; ``vqa.engine.vqa_task`` and
``vqa.engine.caption_task`` are the two tasks the ``gridfeats vqa|caption`` commands build.
"""
