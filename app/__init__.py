"""The application layer: what the command line, the TUI and the bench use to run Duet.

It composes the library (``core``), the backends (found through ``app.backends``) and the model registry
(``models``). Its public API (``app.api`` for front ends):

- ``run(config, overrides, ...)`` trains as a config says (``app.run``), ``resolve_config`` builds the config;
- ``create_backend`` / ``resolve_backend_name`` / ``backend_names`` (``app.backends``);
- ``main`` of ``duet`` (``app.cli``) and of ``python -m core.run`` (``app.run.main``).
"""

from __future__ import annotations

from core.named import register_data, register_model, register_model_file


def _register_models() -> None:
    """The registry's models by name (``demo``, ``smollm2-135m-instruct``), ``data.train: demo``, and GGUF
    files converted on first use."""
    from models.registry import RECOMMENDED

    for name, model in RECOMMENDED.items():
        register_model(name, model.locate)

    def demo_data():
        from models.tiny_chat import demo_data_path

        return demo_data_path()

    def convert_gguf(file, emit):
        from models.gguf import converted_folder

        return converted_folder(file, emit)

    register_data("demo", demo_data)
    register_model_file(".gguf", convert_gguf)


_register_models()
