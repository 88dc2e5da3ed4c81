"""Thin wrapper of larvess-prepare-ade847: ADE20K_2021_17_01 -> the ADE-847 layout (see --help)."""

from larvess.commands.prepare_ade847 import main

raise SystemExit(main())
