"""One module per CLI verb; see vitkit/cli.py."""

# the checkpoint argument of every verb that loads one (all go through vitkit.from_pretrained)
CHECKPOINT_HELP = (
    "a checkpoint (file or folder in any format from_pretrained reads) or a Hub name: "
    "google/vit-base-patch16-224, hf-hub:timm/NAME, vit_small_patch16_224.augreg_in21k"
)


def add_resume_argument(p) -> None:
    """`--resume` of the verbs that run a training job (train, pretrain)."""
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --out (automatic when --out holds last.ckpt)",
    )


def run_training_job(verb: str, job):
    """Run `job()` (fit / pretrain) for `vitkit VERB`: the result where this process should report it, else an
    exit code: 1 with one error line for a diverged run or a checkpoint problem, 0 on ranks other than 0 and for a
    run that stopped early with a checkpoint (which it names)."""
    import os
    import sys

    from ..model.serialization import CheckpointError
    from ..train.loop import TrainingDiverged

    try:
        res = job()
    except (TrainingDiverged, CheckpointError) as e:
        print(f"vitkit {verb}: error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if res.model_path is None:
        print(f"checkpoint: {res.checkpoint_path}")
        return 0
    return res
