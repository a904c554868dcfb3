"""The machinery the peer-to-peer connectors (mooncake, nixl) share.

==========  ====================================================================================
module      what it holds
==========  ====================================================================================
protocol    the side channel's typed, versioned msgpack messages over pyzmq, and its limits
connector   ``P2PConnector``: the scheduler side, the consumer's request loop, the shared settings
producer    the producer's side-channel server and sender threads (``action=serve``)
selftest    the two-process self-test and the bare-engine raw path of ``action=bench``
==========  ====================================================================================
"""
