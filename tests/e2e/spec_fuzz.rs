//! Spec fuzzing of the guarded routes through the gate in front of Synapse.
