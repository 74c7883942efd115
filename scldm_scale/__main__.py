"""``python -m scldm_scale``: the ``scldm-scale`` command line."""

from scldm_scale.cli import main

if __name__ == "__main__":
    main()
