# The two README commands: `make demo` and `make test`. Everything runs from a local .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
SHARED_FIGURES := $(wildcard ../shared/data/figures/medicat/*.png)
DEMO := out/demo

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt annotate/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# For now: open_clip ViT-B-16 (random, BMC-CLIP-shaped .pt) -> Flax -> open_clip, with parity figures.
demo: install
	mkdir -p $(DEMO)
	$(PY) -c "import open_clip, torch; from zoomin_jax.convert.reference import save_bmc_shaped_checkpoint as save; \
	  torch.manual_seed(0); save(open_clip.create_model('ViT-B-16', pretrained=None), '$(DEMO)/bmc_shaped.pt')"
	$(PY) -m zoomin_jax.convert import --src $(DEMO)/bmc_shaped.pt --model ViT-B-16 --out $(DEMO)/flax
	$(PY) -m zoomin_jax.convert verify --flax $(DEMO)/flax --open-clip $(DEMO)/bmc_shaped.pt --model ViT-B-16 \
	  $(if $(SHARED_FIGURES),--images $(SHARED_FIGURES))
	$(PY) -m zoomin_jax.convert export --src $(DEMO)/flax --out $(DEMO)/open_clip_hub
	$(PY) -m zoomin_jax.convert verify --flax $(DEMO)/flax --open-clip $(DEMO)/open_clip_hub --model ViT-B-16

test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q tests
