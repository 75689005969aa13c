"""report: placeholder"""
