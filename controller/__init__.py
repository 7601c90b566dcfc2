"""The entropy controller: a pure decision rule (`controller.rule`) and the Ray actor around it."""
