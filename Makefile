# The two commands of the README: `make run` and `make test`. Each sets everything up itself.
PY := .venv/bin/python
export QT_QPA_PLATFORM_PLUGIN_PATH :=

.PHONY: run test setup setup-test bench installer clean

run:
	@bash scripts/setup.sh
	@$(PY) main.py run-demo

test:
	@bash scripts/setup.sh test,cluster,installer
	@bash scripts/run_tests.sh

bench:
	@bash scripts/setup.sh test,cluster,installer
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

installer:
	@bash scripts/setup.sh installer
	@bash scripts/build_installer.sh

clean:
	rm -rf build dist test-artifacts .pytest_cache
