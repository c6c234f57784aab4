import sys

from longcat.cli import main
from longcat.distributed.node_watch import start_node_watch

start_node_watch()  # under torchrun: stop when this node's agent or another node is lost, instead of hanging
sys.exit(main())
