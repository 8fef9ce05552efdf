# The two commands: `make demo` (the tiny end-to-end recipe) and `make test` (the whole test suite).
PYTHON ?= python3
VENV ?= .venv
export PYTHON VENV

.PHONY: demo small large scaling test install install-dev lint lock

install:
	bash tools/install.sh

install-dev:
	bash tools/install.sh dev

demo: install
	bash tools/install_text_data.sh
	bash tools/install_tts.sh
	bash recipes/run_tiny.sh

# The larger CPU recipe (about an hour on 2 cores): what the method reaches -> runs/small/summary.json.
small: install
	bash tools/install_text_data.sh
	bash tools/install_tts.sh
	bash recipes/run_small.sh

# The large CPU preset (at most 2.5 h on 2 idle cores, 30 h of speech, the whole evaluation sets) -> runs/large/summary.json.
large: install
	bash tools/install_text_data.sh
	bash tools/install_tts.sh
	bash recipes/run_large.sh

# The scaling curve: the large preset at 2 / 5 / 12.5 h (with make large's 30 h), the curve (docs/scaling.png) and
# SSR against stack-8 and the Q-Former at 5 h and 30 h, two seeds (several hours on 2 cores per amount).
scaling: install
	bash tools/install_text_data.sh
	bash tools/install_tts.sh
	bash recipes/run_scaling.sh

test: install-dev
	bash tools/install_tts.sh
	bash tools/install_browser.sh
	$(VENV)/bin/python -m pytest -q tests

lint: install-dev
	$(VENV)/bin/ruff check speechlm alignment recipes tools tests

# After a deliberate upgrade (CONSTRAINTS= make install-dev, then make test): record the versions CI installs.
lock:
	{ sed -n '1,3p' tools/constraints.txt; $(VENV)/bin/python -m pip freeze --exclude-editable \
	  | grep -v -E '^(nvidia-|cuda-|triton=|#)'; } > tools/constraints.txt.new && mv tools/constraints.txt.new tools/constraints.txt
