"""The real PEFT and diffusers packages (on PyTorch) as clients of what lorakit writes. Driven by
tests/unit/test_interop_torch.cpp; needs torch, transformers, peft, diffusers and safetensors,
which CI does not install (the tests skip with a warning when they are missing).

  peft-merge BASE ADAPTER OUT
      Load the Hugging Face model BASE (float32) with transformers, attach the PEFT adapter
      directory ADAPTER with peft.PeftModel.from_pretrained, check that every tensor of the
      adapter file reached the model unchanged (get_peft_model_state_dict gives back the file),
      then merge_and_unload() and save the merged weights to OUT (safetensors, float32).
      Prints JSON {"adapter_tensors", "merged_tensors", "peft_version"}.

  peft-make KIND BASE_OUT ADAPTER_OUT MERGED_OUT
      Let PEFT itself write an adapter of KIND on a tiny model, with every LoRA parameter
      randomized (so that B, the DoRA magnitude and the bias are not their initial values):
        dora      Llama (samples/base-llama's config), use_dora on q/v/o/mlp, float32
        rslora    Llama, use_rslora, rank_pattern and alpha_pattern by short and by layer keys
        gpt2      GPT-2 (Conv1D, fan_in_fan_out) on c_attn/c_proj/c_fc, with lora_bias (PEFT >= 0.14)
        embedding Llama, LoRA on embed_tokens and lm_head too
      Writes the base model (save_pretrained, safetensors, float32) to BASE_OUT, the adapter to
      ADAPTER_OUT, and PEFT's merge_and_unload() weights to MERGED_OUT (safetensors, float32).

  diffusers-make UNET_OUT ADAPTER_OUT MERGED_OUT
      A tiny SD-layout UNet2DConditionModel saved as a diffusers component folder (UNET_OUT), a
      LoRA on its attention, feed-forward, proj_in and resnet convolutions added with PEFT and
      randomized, saved by StableDiffusionPipeline.save_lora_weights (with its adapter metadata
      where diffusers has it) into ADAPTER_OUT, and the UNet's weights with the LoRA merged
      by PEFT saved to MERGED_OUT.

  unet-weights DIR OUT
      Load the UNet folder DIR with diffusers and save its weights to OUT.

  hf-weights DIR OUT
      Load the model folder DIR with transformers (AutoModelForCausalLM, float32) and save its
      weights to OUT: a folder lora-bake wrote must load as the model it was baked from.

  diffusers-lora FILE sd15|sdxl
      Load the LoRA file FILE the way StableDiffusion(XL)Pipeline.load_lora_weights does
      (lora_state_dict: kohya keys are converted by diffusers' own code, SGM block names
      mapped for SDXL), bring the keys to diffusers' PEFT names (lora_A / lora_B) with
      diffusers' own maps, and print JSON {"tensors": {name: [shape, sum, sum of squares]},
      "alphas": {name: alpha}} with names like "unet.<module path>.lora_A.weight".
"""
import json
import sys
import types

import torch
from safetensors.torch import load_file, save_file


def peft_merge(base, adapter, out):
    import peft
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    loaded = get_peft_model_state_dict(model)
    written = load_file(f"{adapter}/adapter_model.safetensors")
    missing = sorted(set(written) - set(loaded))
    extra = sorted(set(loaded) - set(written))
    if missing or extra:
        sys.exit(f"PEFT did not load the adapter as written: not loaded {missing[:5]}, not in the file {extra[:5]}")
    for name, tensor in written.items():
        if not torch.equal(loaded[name].float(), tensor.float()):
            sys.exit(f"PEFT holds other values than the file for {name}")
    merged = model.merge_and_unload()
    state = {k: v.detach().float().contiguous().clone() for k, v in merged.state_dict().items()}
    save_file(state, out)
    print(json.dumps({"adapter_tensors": len(written), "merged_tensors": len(state), "peft_version": peft.__version__}))


def peft_make(kind, base_out, adapter_out, merged_out):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64))
        import dataclasses
        extra = {"lora_bias": True} if "lora_bias" in {f.name for f in dataclasses.fields(LoraConfig)} else {}
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, **extra)
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=172, num_attention_heads=8,
                                             num_key_value_heads=2, num_hidden_layers=2, vocab_size=100))
        if kind == "dora":
            config = LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
        elif kind == "rslora":
            config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"],
                                rank_pattern={"down_proj": 8, "layers.1.self_attn.q_proj": 2},
                                alpha_pattern={"k_proj": 3})
        elif kind == "embedding":
            config = LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q_proj"])
        else:
            sys.exit(f"unknown kind {kind}")
    model = model.float()
    model.save_pretrained(base_out, safe_serialization=True)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "magnitude" in name else 0.0))
    peft_model.save_pretrained(adapter_out)
    merged = peft_model.merge_and_unload()
    state = {k: v.detach().float().contiguous().clone() for k, v in merged.state_dict().items()}
    if kind == "gpt2":
        state.pop("lm_head.weight", None)  # tied to wte; not a tensor of the base file
    save_file(state, merged_out)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)


def diffusers_make(unet_out, adapter_out, merged_out):
    import inspect

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(7)
    unet = tiny_unet()
    unet.save_pretrained(unet_out, safe_serialization=True)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2",
                                                                   "proj_in", "ff.net.2"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    extra = {}
    if "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters:
        extra["unet_lora_adapter_metadata"] = unet.peft_config["default"].to_dict()
    else:
        # Older diffusers keep no alpha: the file then means scale 1, and so must the reference.
        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                for key in module.scaling:
                    module.scaling[key] = 1.0
    StableDiffusionPipeline.save_lora_weights(adapter_out, unet_lora_layers=get_peft_model_state_dict(unet), **extra)
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {k.replace(".base_layer", ""): v.detach().float().contiguous().clone()
             for k, v in unet.state_dict().items() if "lora_" not in k}
    save_file(state, merged_out)
    print(json.dumps({"tensors": len(state), "alpha_metadata": bool(extra)}))


def unet_weights(folder, out):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder)
    state = {k: v.detach().float().contiguous().clone() for k, v in unet.state_dict().items()}
    save_file(state, out)
    print(json.dumps({"tensors": len(state)}))


def hf_weights(folder, out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, out)
    print(json.dumps({"tensors": len(state)}))


def diffusers_lora(path, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import (DIFFUSERS_OLD_TO_DIFFUSERS, DIFFUSERS_TO_PEFT, convert_state_dict,
                                                  convert_unet_state_dict_to_peft)

    if kind == "sdxl":
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(path, unet_config=types.SimpleNamespace(layers_per_block=2))
    else:
        state, alphas = StableDiffusionPipeline.lora_state_dict(path)
    out = {}
    for prefix in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.split(".")[0] == prefix}
        if not part:
            continue
        if prefix == "unet":
            part = convert_unet_state_dict_to_peft(part)
        elif any(".lora_A." in k for k in part):
            pass  # already PEFT names
        else:
            part = convert_state_dict(convert_state_dict(part, DIFFUSERS_OLD_TO_DIFFUSERS), DIFFUSERS_TO_PEFT)
        for k, v in part.items():
            v = v.double()
            out[f"{prefix}.{k}"] = [list(v.shape), float(v.sum()), float((v * v).sum())]
    unknown = [k for k in state if k.split(".")[0] not in ("unet", "text_encoder", "text_encoder_2")]
    if unknown:
        sys.exit(f"diffusers left keys it does not place: {unknown[:5]}")
    print(json.dumps({"tensors": out, "alphas": {k: float(v) for k, v in (alphas or {}).items()}}))


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "peft-merge":
        peft_merge(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "diffusers-make":
        diffusers_make(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "unet-weights":
        unet_weights(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "hf-weights":
        hf_weights(*sys.argv[2:])
    elif len(sys.argv) == 6 and sys.argv[1] == "peft-make":
        peft_make(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "diffusers-lora" and sys.argv[3] in ("sd15", "sdxl"):
        diffusers_lora(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
