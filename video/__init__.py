"""Video copy detection, laid out as VSC 2022's repository separates it: reading frames (``reader``),
descriptors with timestamps (``storage``), candidate pairs (``candidates``), temporal alignment
(``alignment``, ``localization``), metrics (``metrics``); ``embed`` and ``search`` wire them for the
``towhee-isc video`` commands (``cli``). Nothing heavy is imported here."""
