"""C-FIND building blocks shared by the worklist and query/retrieve services.

- ``charset``: decode an Identifier with its Specific Character Set, pick and apply the
  character set of each answer;
- ``matching``: PS3.4 C.2.2.2 attribute matching of a decoded Identifier against stored data;
- ``response``: the answer Identifier (every key asked for, nothing else).
"""
