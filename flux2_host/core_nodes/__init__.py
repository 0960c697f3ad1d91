"""The ComfyUI core nodes the official FLUX.2 workflows use, with ComfyUI's ids, inputs, defaults, widget order and
return types, running on flux2_core. The registry reports them as python_module "nodes", like ComfyUI's own."""

from . import (conditioning, image_ops, images, inpaint, latent, loaders, masks, primitives, sampling, text, training,
               upscale, vae_tiled)

_MODULES = (loaders, conditioning, latent, sampling, images, image_ops, inpaint, masks, upscale, text, primitives,
            vae_tiled, training)

NODE_CLASS_MAPPINGS = {name: cls for module in _MODULES for name, cls in module.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {
    name: title for module in _MODULES for name, title in module.NODE_DISPLAY_NAME_MAPPINGS.items()}
