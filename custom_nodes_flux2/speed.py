"""Speed nodes: regional torch.compile of a FLUX.2 model's blocks."""

from __future__ import annotations

from flux2_core.patched_model import COMPILE_BLOCKS, PatchedModel

CATEGORY = "FLUX.2/speed"


class Flux2CompileModel:
    DESCRIPTION = ("Compiles each block class of the FLUX.2 model once with torch.compile while it samples. The "
                   "first run pays the compile time (about half a minute on a large GPU, minutes on a CPU); "
                   "later steps are faster. Outputs match the uncompiled model within float rounding.")
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("FLUX2_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model, sampled with compiled blocks.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("FLUX2_MODEL", {"tooltip": "The FLUX.2 model to compile."})}}

    def patch(self, model: PatchedModel) -> tuple[PatchedModel]:
        return (model.with_option(COMPILE_BLOCKS, True),)


NODE_CLASS_MAPPINGS = {"Flux2CompileModel": Flux2CompileModel}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2CompileModel": "FLUX.2 Compile Model"}
