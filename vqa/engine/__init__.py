"""The heads on the project's training engine: config, tasks, schedules, commands.

``vqa.engine.trainer.fit_task`` runs any ``TrainingTask`` on ``gridfeats.engine.Trainer``;
``vqa.engine.vqa_task`` and ``vqa.engine.caption_task`` are the two tasks the
``gridfeats vqa|caption`` commands build.
"""
