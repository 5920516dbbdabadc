"""One module per CLI verb; see vitkit/cli.py."""

# the checkpoint argument of every verb that loads one (all go through vitkit.from_pretrained)
CHECKPOINT_HELP = (
    "a checkpoint (file or folder in any format from_pretrained reads) or a Hub name: "
    "google/vit-base-patch16-224, hf-hub:timm/NAME, vit_small_patch16_224.augreg_in21k"
)
