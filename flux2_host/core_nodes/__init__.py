"""The ComfyUI core nodes the official FLUX.2 workflows use, with ComfyUI's ids, inputs, defaults, widget order and
return types, running on flux2_core. The registry reports them as python_module "nodes", like ComfyUI's own."""

from . import (conditioning, dataset_folders, dataset_images, dataset_texts, image_ops, images, inpaint, latent, loaders,
               masks, primitives, sampling, text, training, training_data, upscale, vae_tiled)

_MODULES = (loaders, conditioning, latent, sampling, images, image_ops, inpaint, masks, upscale, text, primitives,
            vae_tiled, training, dataset_folders, dataset_images, dataset_texts, training_data)

NODE_CLASS_MAPPINGS = {name: cls for module in _MODULES for name, cls in module.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {
    name: title for module in _MODULES for name, title in module.NODE_DISPLAY_NAME_MAPPINGS.items()}
