"""What composes the stages: the train -> embed -> score chain, sweeps, the demo, comparisons, status
and export. Nothing here is a stage; everything here runs or reads stages through the graph."""
