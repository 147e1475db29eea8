"""`recship demo`: the main job on built-in defaults (`make demo`).

Grows with the pipeline: today it checks the environment and shows the service contracts that
clients in any language build against.
"""

from __future__ import annotations

import click

from recship.runtime.doctor import doctor_command


@click.command("demo")
@click.pass_context
def demo_command(ctx: click.Context) -> None:
    """Run the end-to-end pipeline on built-in defaults."""
    from rich.console import Console
    from rich.table import Table

    from recship.protos.v1 import admin_pb2, recommender_pb2

    ctx.invoke(doctor_command)
    table = Table(title="recship gRPC contract (protos/recship/v1)")
    table.add_column("service")
    table.add_column("method")
    table.add_column("request -> response")
    for module in (recommender_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                table.add_row(
                    service.full_name,
                    method.name,
                    f"{method.input_type.name} -> {method.output_type.name}",
                )
    Console().print(table)
