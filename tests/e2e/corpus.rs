//! Differential username corpus: the gate's verdict against Synapse's.
