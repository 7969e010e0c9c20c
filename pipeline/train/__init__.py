"""Fine-tuning on Ray Train (`kind: finetune`; the job entry point is jobs.finetune).

    data.py      planned shards read by Ray Data tasks: the streaming pass that checks every row and names
                 the labels before training, and the lazy train/eval datasets (the driver never holds rows)
    labels.py    what train.label_column holds, label names and ids, class weights
    loop.py      what every Ray Train worker runs, and the per-epoch task metrics
    progress.py  the driver's progress bar, fed by rank 0 through a no-CPU actor
    trainer.py   the TorchTrainer: checkpoints, failures, the best epoch
    publish.py   the best checkpoint → a model folder in the output

What a task provides to be trained (`FineTunable`, `Trainable`) is in models.registry, beside `Task`.
"""

__all__: list[str] = []
