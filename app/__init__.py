"""The application layer: what the command line, the TUI and the bench use to run Duet.

It composes the library (``core``), the backends (found through ``app.backends``) and the built-in demo
(``models``). Its public API:

- ``run(config, overrides, ...)`` trains as a config says (``app.run``), ``resolve_config`` builds the config;
- ``create_backend`` / ``resolve_backend_name`` / ``backend_names`` (``app.backends``);
- ``main`` of ``duet`` (``app.cli``) and of ``python -m core.run`` (``app.run.main``).
"""

from __future__ import annotations

from core.named import register_data, register_model


def _register_demo() -> None:
    """``model.path: demo`` and ``data.train: demo`` mean the built-in tiny chat model and its preference set."""

    def model():
        from models.tiny_chat import ensure_demo_model

        return ensure_demo_model()

    def data():
        from models.tiny_chat import demo_data_path

        return demo_data_path()

    register_model("demo", model)
    register_data("demo", data)


_register_demo()
