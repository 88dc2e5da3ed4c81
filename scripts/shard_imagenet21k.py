"""Thin wrapper of larvess-shard: ImageNet-21K download -> WebDataset shards (see --help)."""

from larvess.commands.shard import main

raise SystemExit(main())
