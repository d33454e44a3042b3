"""An in-memory Flower Grid for fast tests: messages go straight to the ClientApp, one Context per
node, with Flower's own Message, records and ClientApp dispatch (no processes, no network)."""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1


class InMemoryGrid(Grid):
    """Nodes ``node_configs`` (node id -> node_config) running ``client_app``; ``fail(node_id, when)``
    makes a node answer with an error (as a crashed node's message does) or drop replies. ``run_id``: the
    Flower run's id (a resumed run is a new one)."""

    def __init__(self, client_app, node_configs: dict[int, dict], run_id: int = 7) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SERVER_NODE
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=dict(cfg), state=RecordDict(),
                                      run_config={})
                         for nid, cfg in node_configs.items()}
        self.dead: set[int] = set()
        self.tamper = None  # (node_id, reply, message) -> reply: a misbehaving client
        self.sent: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used in process
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):  # pragma: no cover
        return []

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # what the SuperLink's push does
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.dead:  # as the SuperLink answers for a node that missed its heartbeats
                error = Message(Error(code=5, reason="node offline"), reply_to=message)
                error.metadata.__dict__["_src_node_id"] = SERVER_NODE
                replies.append(error)
                continue
            try:
                reply = self.client_app(message, self.contexts[node])
            except Exception as error:  # what Flower returns for a ClientApp exception
                reply = Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            if self.tamper is not None:
                reply = self.tamper(node, reply, message)
            if reply is not None:
                replies.append(reply)
        return replies
