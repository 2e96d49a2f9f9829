"""Every key the project puts on the wire: in ``FitIns.config`` (instructions), in
``FitRes.metrics`` (answers) and in ``GetPropertiesRes.properties`` (who a peer is).

Flower config values are scalars, so structured values (architecture, histograms, logs)
travel as JSON strings. User strategies keep every key not named here.
"""

from __future__ import annotations

# --- Instructions (server -> receiver), the protocol's own ------------------------------
ARCH_KEY = "fedphd.arch"  # the U-Net's architecture JSON: receivers rebuild it
ROUND_KEY = "fedphd.round"
# The cloud round an edge's instruction belongs to (flat mode: ROUND_KEY is the cloud round).
# A client seeing a cloud round again replays it from that round's start (resumed cloud).
CLOUD_ROUND_KEY = "fedphd.cloud_round"
EDGE_ROUNDS_KEY = "fedphd.edge_rounds"
LOCAL_STEPS_KEY = "fedphd.local_steps"
LR_KEY = "fedphd.lr"
# Codecs: the uplink codec the answer must use, and how it quantises.
UPLINK_KEY = "fedphd.uplink"
PER_CHANNEL_KEY = "fedphd.per_channel"
ERROR_FEEDBACK_KEY = "fedphd.error_feedback"
BASE_DIGEST_KEY = "fedphd.base_digest"  # a quantised downlink is an update from this model
# Partial sharing: U-Net groups sent in the instruction, trained, and expected in the answer.
SEND_GROUPS_KEY = "fedphd.send_groups"
TRAIN_GROUPS_KEY = "fedphd.train_groups"
RETURN_GROUPS_KEY = "fedphd.return_groups"
EVALUATE_KEY = "fedphd.evaluate"  # an evaluation request of a client's own model
# Re-assignment: {client_id: edge address} from the cloud; an edge sends MOVE_KEY to a client.
ASSIGNMENT_KEY = "fedphd.assignment"
MOVE_KEY = "fedphd.move_to"

# --- Instructions of the methods (server/<method>.py sends, client/<method>.py reads) ----
GROUP_LASSO_KEY = "fedphd.group_lasso"  # lambda of FedPhD's sparse training, 0 = off
PROXIMAL_MU_KEY = "proximal_mu"  # the key Flower's FedProx strategy sends
MESSAGE_PROXIMAL_MU_KEY = "proximal-mu"  # the key of the message API's FedProx
# SCAFFOLD: the server control variate (instruction) and a client's update of its own (answer).
SERVER_CONTROL_KEY = "scaffold_c"
CONTROL_DELTA_KEY = "scaffold_delta_c"
# MOON: weight and temperature of the model-contrastive term.
MOON_MU_KEY = "moon_mu"
MOON_TAU_KEY = "moon_tau"
PHASE_KEY = "fedddpm.phase"  # FedDDPM: "pretrain" (round 1) or "federated"

# Keys of a cloud instruction that an edge passes on to its clients (it sets the rest itself).
FORWARDED_TO_CLIENTS = (GROUP_LASSO_KEY,)

# --- Answers (receiver -> server): FitRes.metrics / EvaluateRes.metrics -------------------
CLIENT_ID_METRIC = "client_id"
EDGE_ID_METRIC = "edge_id"
LOSS_METRIC = "loss"
LABEL_HIST_METRIC = "label_hist"  # JSON list of per-class sample counts
RECEIVED_DIGEST_KEY = "received_digest"  # digest of the model the receiver rebuilt
BYTES_RECEIVED_METRIC = "bytes_received"  # instruction bytes, as the receiver measured them
PAYLOAD_BYTES_METRIC = "payload_bytes"  # tensor bytes of the answer
TRAIN_SECONDS_METRIC = "train_seconds"
STEPS_METRIC = "steps"
GROUPS_RETURNED_METRIC = "groups_returned"
# An edge's answer: its per-round log (JSON) and the bytes its client link carried.
EDGE_LOG_METRIC = "edge_log"
BYTES_DOWN_METRIC = "bytes_down"
BYTES_UP_METRIC = "bytes_up"

# --- Properties (GetPropertiesRes): who a peer is -----------------------------------------
CLIENT_ID_PROPERTY = CLIENT_ID_METRIC
EDGE_ID_PROPERTY = EDGE_ID_METRIC
NUM_EXAMPLES_PROPERTY = "num_examples"
LABEL_HIST_PROPERTY = LABEL_HIST_METRIC
ADDRESS_PROPERTY = "address"  # an edge's address for clients moved to it
EDGE_CLIENTS_PROPERTY = "clients"  # an edge's clients: JSON {client_id: label histogram}
