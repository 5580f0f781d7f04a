"""The stages of a run (sample, score, filter, finetune, correct, evaluate) and the rewards they score
with: functions of a run store and a config. Import io, models and core."""
